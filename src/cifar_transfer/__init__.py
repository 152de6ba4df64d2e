"""cifar-transfer: adapt ImageNet-pretrained CNNs to CIFAR-10 by transfer learning."""

__version__ = "0.1.0"
