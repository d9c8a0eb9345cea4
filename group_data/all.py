"""
Settings for every host (pyinfra group data for the group "all"). Uncomment and change what
you need; every setting, its default and what it does is in README.md's settings table (also
printed by `make settings-table`). A name that is not a setting stops the deploy with a hint.

Secrets do not belong here: see README.md, "Secrets".
"""

# extra_ca_certificates = ["~/corp-proxy-ca.pem"]
# apt_proxy = "http://10.0.0.2:3142"
# rabbitmq_consumer_timeout_ms = 7_200_000
# postgresql_database = "celerydb"
