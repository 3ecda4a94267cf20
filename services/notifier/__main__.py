"""``python -m services.notifier`` — console, Telegram and webhook notifications."""

from libs.common.service import main_for
from services.notifier.service import NotifierService

if __name__ == "__main__":
    main_for(NotifierService)
