"""cifar-dist: distributed batch training of CIFAR-10 classifiers."""
