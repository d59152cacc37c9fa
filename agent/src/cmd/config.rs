//! `--config FILE` for `agent daemon` and `agent serve`: a TOML file whose keys are the
//! commands' long flags (`link_listen = "10.0.0.11:7800"`, `tls_creds = "/etc/pki/qemu"`,
//! `qmp_dir = ["/run/nas-agent/qmp"]`, `insecure = false`). Its settings go in before the
//! command line's, so a flag given on the command line wins over the file (lists add up).
use std::{ffi::OsString, path::Path};

use anyhow::{bail, Context};

/// The subcommands that take a file.
const WITH_CONFIG: &[&str] = &["daemon", "serve"];

/// `args` with `--config FILE` (after one of [`WITH_CONFIG`]) replaced by the file's settings.
pub fn expand(args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some(sub) = args
        .iter()
        .position(|a| a.to_str().is_some_and(|a| WITH_CONFIG.contains(&a)))
    else {
        return Ok(args);
    };
    let mut out: Vec<OsString> = args[..=sub].to_vec();
    let mut rest = Vec::new();
    let mut file = None;
    let mut it = args[sub + 1..].iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--config") => {
                file = Some(it.next().context("--config needs a file")?.clone());
            }
            Some(s) if s.starts_with("--config=") => file = Some(s["--config=".len()..].into()),
            _ => rest.push(a.clone()),
        }
    }
    if let Some(file) = file {
        out.extend(from_file(Path::new(&file))?);
    }
    out.extend(rest);
    Ok(out)
}

/// The file's settings as flags.
fn from_file(path: &Path) -> anyhow::Result<Vec<OsString>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut flags = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        let values = match value {
            toml::Value::Array(a) => a,
            v => vec![v],
        };
        for v in values {
            match v {
                toml::Value::Boolean(true) => flags.push(flag.clone().into()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => flags.extend([flag.clone().into(), s.into()]),
                toml::Value::Integer(n) => {
                    flags.extend([flag.clone().into(), n.to_string().into()])
                }
                other => bail!(
                    "{}: {key} = {other}: expected a string, a number, true/false or a list",
                    path.display()
                ),
            }
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn the_file_goes_before_the_command_line() {
        let dir = std::env::temp_dir().join(format!("agent-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(
            &file,
            "link_listen = \"10.0.0.11:7800\"\ninsecure = true\nmax_sessions = 4\n\
             qmp_dir = [\"/a\", \"/b\"]\nincoming_any_host = false\n",
        )
        .unwrap();
        let args = [
            "agent",
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--max-sessions",
            "8",
        ];
        let got = strings(expand(args.iter().map(Into::into).collect()).unwrap());
        assert_eq!(
            got,
            [
                "agent",
                "serve",
                "--insecure",
                "--link-listen",
                "10.0.0.11:7800",
                "--max-sessions",
                "4",
                "--qmp-dir",
                "/a",
                "--qmp-dir",
                "/b",
                "--max-sessions",
                "8"
            ]
        );
        // Other commands, and commands without --config, are left alone.
        let plain = ["agent", "status", "--json"];
        let got = strings(expand(plain.iter().map(Into::into).collect()).unwrap());
        assert_eq!(got, plain);
        std::fs::write(&file, "link_listen = 3.5\n").unwrap();
        let args = ["agent", "daemon", "--config", file.to_str().unwrap()];
        let e = expand(args.iter().map(Into::into).collect()).unwrap_err();
        assert!(e.to_string().contains("expected a string"), "{e}");
    }
}
