"""Tests of models/: the CIFAR and ImageNet backbones, models/util.py, the frozen-teacher fast path."""
