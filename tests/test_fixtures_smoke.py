from advlab.train import accuracy


def test_lenet_mnist_fixture_is_accurate(lenet_mnist, mnist_data):
    assert accuracy(lenet_mnist, mnist_data[1]) >= 0.978


def test_lenet_digits_fixture_is_accurate(lenet_digits, digits_data):
    assert accuracy(lenet_digits, digits_data[1]) >= 0.95
