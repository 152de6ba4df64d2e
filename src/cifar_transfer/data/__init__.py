"""Data in: CIFAR-10/100 archives, folders of photos, splits, and the on-device batch transforms."""
