"""``python -m service.api``: serve with the settings from ``RECLORA_*`` environment variables."""

from service.api.server import main

if __name__ == "__main__":
    main()
