//! Disk image: GPT, ESP (FAT32), root (ext4), qcow2.
