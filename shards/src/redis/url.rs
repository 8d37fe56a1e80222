//! `redis_url` of the `redis` adapter: `redis://[[user]:password@]host[:port][/db]`.

/// A parsed `redis://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Logical database (`SELECT`), 0 by default.
    pub db: u32,
}

/// Why a `redis_url` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{0:?} is not a redis:// URL (rediss:// and unix sockets are not supported)")]
    Scheme(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?} has an invalid port")]
    Port(String),
    #[error("{0:?} has an invalid database number (expected /0, /1, …)")]
    Db(String),
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, UrlError> {
        let rest = url.strip_prefix("redis://").ok_or_else(|| UrlError::Scheme(url.to_owned()))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (credentials, hostport) = match authority.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, authority),
        };
        let (username, password) = match credentials {
            None => (None, None),
            Some(c) => match c.split_once(':') {
                Some((user, pass)) => ((!user.is_empty()).then(|| percent_decode(user)), Some(percent_decode(pass))),
                None => (None, Some(percent_decode(c))),
            },
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| UrlError::NoHost(url.to_owned()))?;
            (host, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(UrlError::NoHost(url.to_owned()));
        }
        let port = match port {
            None => 6379,
            Some(p) => p.parse().ok().filter(|&p: &u16| p > 0).ok_or_else(|| UrlError::Port(url.to_owned()))?,
        };
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let db = if path.is_empty() { 0 } else { path.parse().map_err(|_| UrlError::Db(url.to_owned()))? };
        Ok(RedisUrl { host: host.to_owned(), port, username, password, db })
    }

    /// `host:port` for connecting and for log lines (never the password).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// `%XX` escapes of a user name or password; an invalid escape stays as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_iii_default_and_full_forms() {
        let url = RedisUrl::parse("redis://localhost:6379").unwrap();
        assert_eq!((url.host.as_str(), url.port, url.db, url.password), ("localhost", 6379, 0, None));
        let url = RedisUrl::parse("redis://:s%40cret@10.0.0.2/3").unwrap();
        assert_eq!((url.host.as_str(), url.port, url.db, url.password.as_deref(), url.username), ("10.0.0.2", 6379, 3, Some("s@cret"), None));
        let url = RedisUrl::parse("redis://app:pw@[::1]:7000").unwrap();
        assert_eq!((url.address(), url.username.as_deref()), ("[::1]:7000".to_string(), Some("app")));
    }

    #[test]
    fn unusable_urls_are_refused() {
        assert!(matches!(RedisUrl::parse("rediss://h"), Err(UrlError::Scheme(_))));
        assert!(matches!(RedisUrl::parse("localhost:6379"), Err(UrlError::Scheme(_))));
        assert!(matches!(RedisUrl::parse("redis://:6379"), Err(UrlError::NoHost(_))));
        assert!(matches!(RedisUrl::parse("redis://h:0"), Err(UrlError::Port(_))));
        assert!(matches!(RedisUrl::parse("redis://h:x"), Err(UrlError::Port(_))));
        assert!(matches!(RedisUrl::parse("redis://h/x"), Err(UrlError::Db(_))));
    }
}
