"""What admins read: progress per batch and device, device lists and pages, versions and packages."""
