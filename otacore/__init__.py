"""The OTA domain: catalog, eligibility, jobs, store, package files, signed URLs, codecs.

Imports neither amqtt nor aiohttp; broker_plugin/ and fileserver/ translate to and from it.
"""
