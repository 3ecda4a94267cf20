"""Notification channels. Each runs in its own thread behind a bounded queue."""
