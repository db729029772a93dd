from advlab.train import evaluate


def test_lenet_mnist_fixture_is_accurate(lenet_mnist, mnist_data):
    assert evaluate(lenet_mnist, mnist_data[1]) >= 0.978


def test_lenet_digits_fixture_is_accurate(lenet_digits, digits_data):
    assert evaluate(lenet_digits, digits_data[1]) >= 0.95
