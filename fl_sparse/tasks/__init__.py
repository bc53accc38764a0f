"""The built-in experiments' data, models and local training.

Fashion-MNIST/MNIST/CIFAR-10, the papers' MLPs and CNNs, ResNet-18, VGG-19.
One user of the library, like any user's own task.
"""
