"""Model subcommands (train, predict, …) registered onto the CLI parser."""


def register(sub):
    pass
