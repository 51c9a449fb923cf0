# palisade %post ($1: 1 on install, 2 or more on upgrade). Changes no CNI or
# runtime configuration: `palisadectl install-cni` does that.
if [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null 2>&1 || :
	systemctl enable --now sys-fs-bpf.mount >/dev/null 2>&1 || :
fi
if ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
	mount -t bpf bpffs /sys/fs/bpf 2>/dev/null ||
		echo "palisade: could not mount the BPF file system at /sys/fs/bpf; mount it before starting containers" >&2
fi
if [ "$1" -ge 2 ] && [ -n "$(ls -d /sys/fs/bpf/palisade/maps* 2>/dev/null)" ]; then
	/usr/bin/palisadectl upgrade ||
		echo "palisade: some containers keep the previous eBPF programs (see above)" >&2
fi
# The daemon runs this build from now on (started on install, restarted
# on upgrade); enforcement does not depend on it.
if [ -d /run/systemd/system ]; then
	if [ "$1" -eq 1 ]; then
		systemctl enable --now palisade.service >/dev/null 2>&1 || :
	else
		systemctl try-restart palisade.service >/dev/null 2>&1 || :
	fi
fi
if [ "$1" -eq 1 ]; then
	echo "palisade is installed. Add it to this node's CNI network with: palisadectl install-cni"
fi
exit 0
