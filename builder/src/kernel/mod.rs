//! Kernel: Debian packages, configs, modules.
