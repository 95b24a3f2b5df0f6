"""Myocardial perfusion SPECT polar maps: reading, features, classifiers, clinical scores."""
