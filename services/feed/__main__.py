"""``python -m services.feed`` — run the feed with the configured source."""

from libs.common.service import main_for
from services.feed.service import FeedService

if __name__ == "__main__":
    main_for(FeedService)
