"""Tests of the methods: distiller_zoo/ and crd/ (losses, Distillers, options, autocast)."""
