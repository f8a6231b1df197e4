"""The ``einfx`` command line: demo, explain, convert."""
