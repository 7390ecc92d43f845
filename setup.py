"""Installs xcos_tf; the metadata and pins live in setup.cfg."""
import setuptools

setuptools.setup()
