"""Tests of dataset/: loaders, the tensor pipeline, transfer sets, views, splits, bad files."""
