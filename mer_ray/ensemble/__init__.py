"""The MELD ensemble: every member on dev and test, cross-fitted fusion, bootstrap report (`mer ensemble`)."""
