"""The error every layer raises for a wrong request (config, inputs, output, model): the CLI prints
it as one line and exits 2 (:mod:`tokenskip.cli`). Its own module so that any module can raise it
without importing the CLI's checks."""


class UserError(Exception):
    """A problem with what the user asked for (config, inputs, output, model): one clear line."""
