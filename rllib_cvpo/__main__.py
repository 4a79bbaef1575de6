"""``python -m rllib_cvpo``: the ``rllib-cvpo`` command."""

from rllib_cvpo.cli import main

if __name__ == "__main__":
    main()
