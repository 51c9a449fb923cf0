# palisade %preun ($1: 0 when the package is being removed, 1 on upgrade).
if [ "$1" -eq 0 ]; then
	listed=""
	for f in /etc/cni/net.d/*.conf /etc/cni/net.d/*.conflist /etc/cni/net.d/*.json; do
		[ -f "$f" ] || continue
		if grep -qs '"type"[[:space:]]*:[[:space:]]*"palisade"' "$f"; then
			listed="$listed $f"
		fi
	done
	if [ -n "$listed" ] && [ "${PALISADE_FORCE_REMOVE:-}" != 1 ]; then
		echo "palisade is still a plugin of:$listed" >&2
		echo "Containers on that network could neither start nor be deleted without it." >&2
		echo "Run 'palisadectl uninstall-cni' first, or remove with PALISADE_FORCE_REMOVE=1." >&2
		exit 1
	fi
	if [ -d /run/systemd/system ]; then
		systemctl disable --now palisade.service >/dev/null 2>&1 || :
		systemctl disable sys-fs-bpf.mount >/dev/null 2>&1 || :
	fi
	enforced=$(/usr/bin/palisadectl get endpoints 2>/dev/null | tail -n +2 | grep -c . || :)
	if [ "${PALISADE_DETACH_ON_REMOVE:-}" = 1 ]; then
		/usr/bin/palisadectl reset --yes
	elif [ "${enforced:-0}" -gt 0 ]; then
		echo "palisade: $enforced container interface(s) stay protected: their eBPF programs remain" >&2
		echo "attached (pinned under /sys/fs/bpf/palisade) until the containers are deleted." >&2
		echo "Nothing was detached. To detach everything, remove with PALISADE_DETACH_ON_REMOVE=1" >&2
		echo "or run 'palisadectl reset --yes' first." >&2
	fi
fi
exit 0
