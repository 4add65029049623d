"""The test suite, a package so that test modules share :mod:`tests.helpers`."""
