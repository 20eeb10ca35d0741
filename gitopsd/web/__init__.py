"""The read-only web view on the daemon's HTTP port.

- ``views``  — the documents each page shows, made from the daemon's memory;
- ``trail``  — the audit records, verify verdicts and diff texts the pages
  read, kept in memory so a page view sends no request to the apiserver;
- ``site``   — the routes, the token, the headers;
- ``static`` — the page, its script and its style, shipped in the package:
  no build step, no CDN.
"""
