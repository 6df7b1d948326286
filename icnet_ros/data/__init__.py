"""Datasets (Cityscapes, CamVid, COCO-Stuff layouts), augmentation and synthetic drives."""
