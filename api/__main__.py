"""``python -m api``: see ``api.main``."""

from api.main import main

main()
