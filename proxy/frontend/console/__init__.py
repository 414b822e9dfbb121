"""The admin web console under /console/: a cookie session over a session token, pages, and a relay to /admin/v1."""
