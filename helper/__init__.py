"""Training utilities shared by train_teacher.py and train_student.py."""
