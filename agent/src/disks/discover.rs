//! Discovery of block devices through HostPaths (sysfs, /dev/disk/by-id, host mountinfo).
