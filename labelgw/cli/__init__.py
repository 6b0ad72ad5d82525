"""The command line: twistd options, settings, the services assembled, the listeners, the reactor choice."""
