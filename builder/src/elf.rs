//! ELF shared-library closure.
