"""Training scripts run end to end on tiny data: train_teacher.py, train_student.py, cross-modal runs."""
