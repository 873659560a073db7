//! Looking up the agent user in the guest's `/etc/passwd`.
//!
//! **Invariant:** a lookup never yields uid 0 or gid 0, and the home
//! directory is an absolute path without `.`/`..` components: the agent is
//! always unprivileged and its home is a plain place under the root.

/// An unprivileged user the agent runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id (never 0).
    pub uid: u32,
    /// Primary group id (never 0).
    pub gid: u32,
    /// Absolute home directory in the guest.
    pub home: String,
}

/// Why a user cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswdError {
    /// No line names the user.
    #[error("user `{name}` is not in /etc/passwd; the guest image must define it")]
    NotFound {
        /// The user looked for.
        name: String,
    },
    /// The user's line is malformed or unsafe.
    #[error("user `{name}` in /etc/passwd: {reason}")]
    Invalid {
        /// The user.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Finds `name` in the text of a passwd file.
pub fn lookup(passwd: &str, name: &str) -> Result<User, PasswdError> {
    let invalid = |reason| PasswdError::Invalid {
        name: name.to_owned(),
        reason,
    };
    let line = passwd
        .lines()
        .find(|line| line.split(':').next() == Some(name) && !name.is_empty())
        .ok_or_else(|| PasswdError::NotFound {
            name: name.to_owned(),
        })?;
    let fields: Vec<&str> = line.split(':').collect();
    let [_, _, uid, gid, _, home, _] = fields.as_slice() else {
        return Err(invalid("expected 7 colon-separated fields"));
    };
    let uid: u32 = uid.parse().map_err(|_| invalid("uid is not a number"))?;
    let gid: u32 = gid.parse().map_err(|_| invalid("gid is not a number"))?;
    if uid == 0 || gid == 0 {
        return Err(invalid("uid and gid must not be 0"));
    }
    if !home.starts_with('/')
        || home
            .split('/')
            .skip(1)
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(invalid(
            "home must be an absolute path without empty, `.` or `..` components",
        ));
    }
    Ok(User {
        name: name.to_owned(),
        uid,
        gid,
        home: (*home).to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        agent:x:1000:1000:agent:/home/agent:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
        rootish:x:0:1000::/root:/bin/sh\n\
        grp0:x:5:0::/home/g:/bin/sh\n\
        short:x:7:7\n\
        rel:x:8:8::home/rel:/bin/sh\n\
        dots:x:9:9::/home/../etc:/bin/sh\n\
        slash:x:10:10::/:/bin/sh\n\
        nan:x:a:1::/h:/bin/sh\n";

    #[test]
    fn lookups() {
        assert_eq!(
            lookup(PASSWD, "agent"),
            Ok(User {
                name: "agent".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/agent".into()
            })
        );
        assert_eq!(lookup(PASSWD, "nobody").unwrap().uid, 65534);
        let cases = [
            ("root", "invalid"),
            ("rootish", "invalid"),
            ("grp0", "invalid"),
            ("short", "invalid"),
            ("rel", "invalid"),
            ("dots", "invalid"),
            ("slash", "invalid"),
            ("nan", "invalid"),
            ("missing", "not found"),
            ("", "not found"),
            ("agen", "not found"),
            ("agent:x", "not found"),
        ];
        for (name, expected) in cases {
            let got = match lookup(PASSWD, name) {
                Ok(_) => "ok",
                Err(PasswdError::NotFound { .. }) => "not found",
                Err(PasswdError::Invalid { .. }) => "invalid",
            };
            assert_eq!(got, expected, "{name:?}");
        }
    }
}
