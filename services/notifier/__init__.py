"""The notifier: tells the trader about fills, rejections, alerts and silent services."""
