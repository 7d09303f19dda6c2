//! Inspection of a device for signatures (partition tables, filesystems, RAID, LVM, LUKS, ZFS).
