"""One module per ``salf`` subcommand, each ``run(options) -> Result``: the file-based adapters over the
Python API (``salf.api``) and the benchmark. ``salf.cli`` parses the flags into the options
(``salf.config.commands``) and calls ``salf.commands.<command>.run``."""
