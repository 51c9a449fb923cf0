# palisade %postun ($1: 0 when removed). The state in /var/lib/palisade
# (policies, endpoints) stays, as RPM keeps files it did not install.
if [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null 2>&1 || :
fi
exit 0
