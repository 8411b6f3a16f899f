"""Test support that ships with the package: :mod:`~diloco.testing.faults`, the env-driven
fault injection the tests switch on. Never used by a real run unless its variables are set."""
