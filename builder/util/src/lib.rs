//! kimg's shared utilities: running external commands, hashing, the cache directory,
//! civil time, and file I/O whose errors name the path.

pub mod cache;
pub mod civil;
pub mod cmd;
pub mod fs;
pub mod hash;
