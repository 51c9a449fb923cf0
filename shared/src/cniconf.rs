//! Adding palisade to a node's CNI network configuration and taking it out
//! again (`palisadectl install-cni` / `uninstall-cni`).
//!
//! The runtime reads the first file of its configuration directory, in name
//! order, that ends in `.conf`, `.conflist` or `.json`. Installing appends a
//! palisade entry to that file's plugin list by inserting text just before
//! the list's closing bracket, so every other byte of the file stays as the
//! network plugin (or the operator) wrote it; uninstalling removes exactly
//! that text again, so a round trip gives back the original bytes. A
//! single-plugin `.conf` becomes a `.conflist` next to it and the `.conf` is
//! kept as a backup, which uninstalling puts back.
//!
//! Files are replaced atomically (a temporary file in the same directory,
//! synced, then renamed over the original), a copy of the original is kept
//! as `<file>.palisade-bak` (an extension no runtime loads), and a file that
//! cannot be read as a CNI configuration is refused and left untouched.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_json::{Map, Value, value::RawValue};

use crate::cni::SUPPORTED_VERSIONS;

/// Where runtimes look by default.
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// The plugin type palisade registers as.
pub const PLUGIN_TYPE: &str = "palisade";
/// Suffix of the copies kept of originals.
pub const BACKUP_SUFFIX: &str = ".palisade-bak";

const CONF_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];

#[derive(Debug, thiserror::Error)]
pub enum CniConfError {
    #[error(
        "no CNI network configuration in {dir}: install the network plugin (flannel, calico, bridge, ...) first, or name a file with --conflist"
    )]
    NoConfig { dir: PathBuf },
    #[error("{path} cannot be read: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a usable CNI configuration, left untouched: {problem}")]
    Malformed { path: PathBuf, problem: String },
    #[error("{path} uses cniVersion {version:?}, which palisade does not speak (it speaks {}); upgrade the network configuration first", SUPPORTED_VERSIONS.join(", "))]
    Version { path: PathBuf, version: String },
    #[error("converting {from} needs {to}, which exists already; remove or rename it first")]
    Exists { from: PathBuf, to: PathBuf },
    #[error("the palisade plugin entry is not valid: {0}")]
    Entry(String),
    #[error("{op} {path}: {source}")]
    Write {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> CniConfError {
    let path = path.to_owned();
    move |source| CniConfError::Read { path, source }
}

fn write_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CniConfError {
    let path = path.to_owned();
    move |source| CniConfError::Write { op, path, source }
}

fn malformed(path: &Path, problem: impl Into<String>) -> CniConfError {
    CniConfError::Malformed {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// What install or uninstall did (or, with `dry_run`, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// palisade was appended to `file`.
    Installed {
        file: PathBuf,
        backup: PathBuf,
        /// The single-plugin file `file` was made from (now the backup).
        converted_from: Option<PathBuf>,
        /// The new contents of `file`.
        contents: String,
    },
    /// `file` already lists palisade; nothing changed.
    AlreadyInstalled { file: PathBuf },
    /// palisade was removed from `file`.
    Uninstalled {
        file: PathBuf,
        /// `file` was a conversion and the original is back at this path.
        restored: Option<PathBuf>,
        /// Whether the result is byte for byte the backup taken at install.
        matches_backup: bool,
        contents: String,
    },
    /// No configuration lists palisade.
    NotInstalled { dir: PathBuf },
}

impl Outcome {
    /// One line for people.
    pub fn describe(&self, dry_run: bool) -> String {
        let would = |s: &str| {
            if dry_run {
                format!("would {s}")
            } else {
                s.to_owned()
            }
        };
        match self {
            Outcome::Installed {
                file,
                backup,
                converted_from: None,
                ..
            } => format!(
                "{} {} (original kept as {})",
                would("added palisade as the last plugin of"),
                file.display(),
                backup.display()
            ),
            Outcome::Installed {
                file,
                backup,
                converted_from: Some(from),
                ..
            } => format!(
                "{} {} into {} with palisade as its last plugin (original kept as {})",
                would("converted"),
                from.display(),
                file.display(),
                backup.display()
            ),
            Outcome::AlreadyInstalled { file } => {
                format!("palisade is already in {}; nothing to do", file.display())
            }
            Outcome::Uninstalled {
                file,
                restored: Some(orig),
                ..
            } => format!(
                "{} {} and {} {}",
                would("restored"),
                orig.display(),
                if dry_run { "remove" } else { "removed" },
                file.display()
            ),
            Outcome::Uninstalled {
                file,
                restored: None,
                matches_backup,
                ..
            } => {
                let mut s = format!("{} {}", would("removed palisade from"), file.display());
                if !matches_backup {
                    s.push_str(
                        " (the file changed since palisade was installed, so only the \
                         palisade entry was taken out; the backup was kept)",
                    );
                }
                s
            }
            Outcome::NotInstalled { dir } => format!(
                "no CNI configuration in {} lists palisade; nothing to do",
                dir.display()
            ),
        }
    }
}

/// The configuration files of `dir` in the order runtimes consider them.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>, CniConfError> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(read_err(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| CONF_EXTENSIONS.contains(&e))
                && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The kind of file, from its extension (as libcni decides).
fn is_conflist(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("conflist")
}

#[derive(Deserialize)]
struct RawList<'a> {
    #[serde(borrow)]
    plugins: Option<&'a RawValue>,
}

/// A parsed conflist: the value, and where its plugin list and each plugin
/// sit in the text.
struct Parsed {
    value: Value,
    /// Byte range of the `plugins` array, brackets included.
    list: (usize, usize),
    /// Byte range of each plugin in the array.
    items: Vec<(usize, usize)>,
}

fn offset_in(text: &str, part: &str) -> usize {
    part.as_ptr() as usize - text.as_ptr() as usize
}

fn check_version(path: &Path, value: &Value) -> Result<(), CniConfError> {
    let version = value
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed(path, "it has no \"cniVersion\""))?;
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(CniConfError::Version {
            path: path.to_owned(),
            version: version.to_owned(),
        });
    }
    Ok(())
}

fn check_plugin(path: &Path, i: usize, plugin: &Value) -> Result<(), CniConfError> {
    let obj = plugin
        .as_object()
        .ok_or_else(|| malformed(path, format!("plugin {} is not an object", i + 1)))?;
    match obj.get("type") {
        Some(Value::String(t)) if !t.is_empty() => Ok(()),
        _ => Err(malformed(path, format!("plugin {} has no \"type\"", i + 1))),
    }
}

fn json_error(path: &Path, e: &serde_json::Error) -> CniConfError {
    malformed(path, format!("not valid JSON: {e}"))
}

fn parse_conflist(path: &Path, text: &str) -> Result<Parsed, CniConfError> {
    let value: Value = serde_json::from_str(text).map_err(|e| json_error(path, &e))?;
    let obj = value
        .as_object()
        .ok_or_else(|| malformed(path, "the top level is not a JSON object"))?;
    match obj.get("name") {
        Some(Value::String(n)) if !n.is_empty() => {}
        _ => return Err(malformed(path, "it has no network \"name\"")),
    }
    check_version(path, &value)?;
    let raw: RawList<'_> = serde_json::from_str(text).map_err(|e| json_error(path, &e))?;
    let list = raw
        .plugins
        .ok_or_else(|| malformed(path, "it has no \"plugins\" list"))?;
    let items: Vec<&RawValue> = serde_json::from_str(list.get())
        .map_err(|_| malformed(path, "\"plugins\" is not a list"))?;
    if items.is_empty() {
        return Err(malformed(path, "\"plugins\" is empty"));
    }
    let plugins = value["plugins"].as_array().cloned().unwrap_or_default();
    for (i, p) in plugins.iter().enumerate() {
        check_plugin(path, i, p)?;
    }
    let start = offset_in(text, list.get());
    let list_text = list.get();
    let items = items
        .iter()
        .map(|item| {
            let s = offset_in(list_text, item.get()) + start;
            (s, s + item.get().len())
        })
        .collect();
    Ok(Parsed {
        value,
        list: (start, start + list_text.len()),
        items,
    })
}

fn is_palisade(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// The indentation of the line `pos` is on.
fn line_indent(text: &str, pos: usize) -> &str {
    let line_start = text[..pos].rfind('\n').map_or(0, |i| i + 1);
    let line = &text[line_start..];
    let end = line
        .find(|c: char| c != ' ' && c != '\t')
        .unwrap_or(line.len());
    &line[..end]
}

/// `entry` laid out like the plugins around it: on one line when they are
/// on one line, else pretty-printed with their indentation.
fn render_entry(entry: &Value, item_indent: &str, unit: &str, compact: bool) -> String {
    if compact {
        return serde_json::to_string(entry).unwrap_or_default();
    }
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(unit.as_bytes());
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    if serde::Serialize::serialize(entry, &mut ser).is_err() {
        return serde_json::to_string(entry).unwrap_or_default();
    }
    let pretty = String::from_utf8(buf).unwrap_or_default();
    pretty.replace('\n', &format!("\n{item_indent}"))
}

/// Insert `entry` as the last plugin of the conflist `text`.
fn insert_entry(text: &str, parsed: &Parsed, entry: &Value) -> String {
    let (_, last_end) = *parsed.items.last().expect("plugins are not empty");
    let (first_start, _) = parsed.items[0];
    let between_open_and_first = &text[parsed.list.0 + 1..first_start];
    let compact = !between_open_and_first.contains('\n');
    let item_indent = line_indent(text, first_start);
    let list_indent = line_indent(text, parsed.list.0);
    let unit = item_indent
        .strip_prefix(list_indent)
        .filter(|u| !u.is_empty())
        .unwrap_or("  ");
    let separator = if compact {
        // Whatever separates the plugins already (", " or ",").
        match parsed.items.get(1) {
            Some((second, _)) => {
                let (_, first_end) = parsed.items[0];
                text[first_end..*second].to_owned()
            }
            None => ", ".to_owned(),
        }
    } else {
        format!(",\n{item_indent}")
    };
    let rendered = render_entry(entry, item_indent, unit, compact);
    let mut out = String::with_capacity(text.len() + rendered.len() + 16);
    out.push_str(&text[..last_end]);
    out.push_str(&separator);
    out.push_str(&rendered);
    out.push_str(&text[last_end..]);
    out
}

/// Remove the palisade plugins from the conflist `text`: each with the
/// separator before it, so that an inserted entry leaves no trace.
fn remove_entries(text: &str, parsed: &Parsed) -> String {
    let plugins = parsed.value["plugins"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    let mut cursor = 0;
    for (i, p) in plugins.iter().enumerate() {
        if !is_palisade(p) {
            continue;
        }
        let (start, end) = parsed.items[i];
        let (cut_from, cut_to) = if i > 0 {
            // From the end of the previous plugin: the comma and layout.
            (parsed.items[i - 1].1, end)
        } else if let Some((next, _)) = parsed.items.get(1) {
            (start, *next)
        } else {
            (start, end)
        };
        if cut_from < cursor {
            continue;
        }
        out.push_str(&text[cursor..cut_from]);
        cursor = cut_to;
    }
    out.push_str(&text[cursor..]);
    out
}

/// A single-plugin configuration as the conflist libcni would read it, with
/// `entry` appended.
fn convert_conf(path: &Path, text: &str, entry: Option<&Value>) -> Result<Value, CniConfError> {
    let value: Value = serde_json::from_str(text).map_err(|e| json_error(path, &e))?;
    let mut obj: Map<String, Value> = value
        .as_object()
        .cloned()
        .ok_or_else(|| malformed(path, "the top level is not a JSON object"))?;
    if obj.contains_key("plugins") {
        return Err(malformed(
            path,
            "it has a \"plugins\" list but is not named .conflist; rename it to .conflist",
        ));
    }
    check_plugin(path, 0, &value)?;
    let name = match obj.remove("name") {
        Some(Value::String(n)) if !n.is_empty() => n,
        _ => return Err(malformed(path, "it has no network \"name\"")),
    };
    check_version(path, &value)?;
    let version = obj.remove("cniVersion").unwrap_or(Value::Null);
    let mut plugins = vec![Value::Object(obj)];
    if let Some(e) = entry {
        plugins.push(e.clone());
    }
    let mut list = Map::new();
    list.insert("cniVersion".into(), version);
    list.insert("name".into(), Value::String(name));
    list.insert("plugins".into(), Value::Array(plugins));
    Ok(Value::Object(list))
}

fn pretty(value: &Value) -> String {
    let mut s = serde_json::to_string_pretty(value).unwrap_or_default();
    s.push('\n');
    s
}

fn backup_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(BACKUP_SUFFIX);
    PathBuf::from(s)
}

/// Write `contents` to `path` atomically, with `mode`.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CniConfError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A name no runtime loads while it is being written.
    let tmp = dir.join(format!(".{name}.palisade-tmp"));
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(write_err("write", path))
}

fn sync_dir(path: &Path) -> Result<(), CniConfError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err("sync directory of", path))
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777)
}

/// The palisade entry: `{"type": "palisade"}` plus any settings given.
pub fn plugin_entry(settings: Option<&str>) -> Result<Value, CniConfError> {
    let mut obj = match settings {
        None => Map::new(),
        Some(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(o)) => o,
            Ok(_) => return Err(CniConfError::Entry("it must be a JSON object".into())),
            Err(e) => return Err(CniConfError::Entry(format!("not valid JSON: {e}"))),
        },
    };
    match obj.get("type") {
        None => {
            obj.insert("type".into(), Value::String(PLUGIN_TYPE.into()));
        }
        Some(Value::String(t)) if t == PLUGIN_TYPE => {}
        Some(other) => {
            return Err(CniConfError::Entry(format!(
                "\"type\" must be \"{PLUGIN_TYPE}\", not {other}"
            )));
        }
    }
    // Canonical order: type first, then the settings as given.
    let mut out = Map::new();
    out.insert("type".into(), Value::String(PLUGIN_TYPE.into()));
    for (k, v) in obj {
        if k != "type" {
            out.insert(k, v);
        }
    }
    Ok(Value::Object(out))
}

/// The file install works on: the one named, else the one the runtime uses.
fn target(dir: &Path, explicit: Option<&Path>) -> Result<PathBuf, CniConfError> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => config_files(dir)?
            .into_iter()
            .next()
            .ok_or_else(|| CniConfError::NoConfig {
                dir: dir.to_owned(),
            })?,
    };
    // Replace what a symlink points to, not the symlink.
    fs::canonicalize(&path).map_err(read_err(&path))
}

/// Add palisade as the last plugin of the network configuration.
pub fn install(
    dir: &Path,
    explicit: Option<&Path>,
    entry: &Value,
    dry_run: bool,
) -> Result<Outcome, CniConfError> {
    let path = target(dir, explicit)?;
    let text = fs::read_to_string(&path).map_err(read_err(&path))?;
    let backup = backup_path(&path);
    let mode = mode_of(&path);

    let looks_like_list = serde_json::from_str::<Value>(&text)
        .ok()
        .is_some_and(|v| v.get("plugins").is_some());
    if is_conflist(&path) || (looks_like_list && path.extension() == Some("json".as_ref())) {
        let parsed = parse_conflist(&path, &text)?;
        let plugins = parsed.value["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if plugins.iter().any(is_palisade) {
            return Ok(Outcome::AlreadyInstalled { file: path });
        }
        let contents = insert_entry(&text, &parsed, entry);
        // The result must read back as the same list plus palisade.
        let check: Value = serde_json::from_str(&contents).map_err(|e| {
            malformed(
                &path,
                format!("inserting the entry would break the file: {e}"),
            )
        })?;
        let mut expected = parsed.value.clone();
        if let Some(list) = expected["plugins"].as_array_mut() {
            list.push(entry.clone());
        }
        if check != expected {
            return Err(malformed(
                &path,
                "inserting the entry would change other parts of the file",
            ));
        }
        if !dry_run {
            write_atomic(&backup, text.as_bytes(), mode)?;
            write_atomic(&path, contents.as_bytes(), mode)?;
        }
        return Ok(Outcome::Installed {
            file: path,
            backup,
            converted_from: None,
            contents,
        });
    }

    // A single-plugin configuration: make a conflist beside it.
    let list = convert_conf(&path, &text, Some(entry))?;
    let file = path.with_extension("conflist");
    if file.exists() {
        return Err(CniConfError::Exists {
            from: path,
            to: file,
        });
    }
    let contents = pretty(&list);
    if !dry_run {
        write_atomic(&file, contents.as_bytes(), mode)?;
        // Until this rename the runtime still reads the .conf (it sorts
        // first), afterwards the .conflist: never neither.
        fs::rename(&path, &backup).map_err(write_err("move aside", &path))?;
        sync_dir(&path)?;
    }
    Ok(Outcome::Installed {
        file,
        backup,
        converted_from: Some(path),
        contents,
    })
}

/// Take palisade out of the network configuration again.
pub fn uninstall(
    dir: &Path,
    explicit: Option<&Path>,
    dry_run: bool,
) -> Result<Outcome, CniConfError> {
    let path = match explicit {
        Some(p) => fs::canonicalize(p).map_err(read_err(p))?,
        None => {
            let mut found = None;
            for f in config_files(dir)? {
                let Ok(text) = fs::read_to_string(&f) else {
                    continue;
                };
                let lists_palisade = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("plugins").and_then(Value::as_array).cloned())
                    .is_some_and(|p| p.iter().any(is_palisade));
                if lists_palisade {
                    found = Some(f);
                    break;
                }
            }
            match found {
                Some(f) => fs::canonicalize(&f).map_err(read_err(&f))?,
                None => {
                    return Ok(Outcome::NotInstalled {
                        dir: dir.to_owned(),
                    });
                }
            }
        }
    };
    let text = fs::read_to_string(&path).map_err(read_err(&path))?;
    let parsed = parse_conflist(&path, &text)?;
    let plugins = parsed.value["plugins"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !plugins.iter().any(is_palisade) {
        return Ok(Outcome::NotInstalled {
            dir: path.parent().unwrap_or(dir).to_owned(),
        });
    }
    let contents = remove_entries(&text, &parsed);
    let remaining: Value = serde_json::from_str(&contents).map_err(|e| {
        malformed(
            &path,
            format!("removing the entry would break the file: {e}"),
        )
    })?;
    let mut expected = parsed.value.clone();
    if let Some(list) = expected["plugins"].as_array_mut() {
        list.retain(|p| !is_palisade(p));
    }
    if remaining != expected {
        return Err(malformed(
            &path,
            "removing the entry would change other parts of the file",
        ));
    }
    if expected["plugins"].as_array().is_some_and(Vec::is_empty) {
        return Err(malformed(
            &path,
            "palisade is its only plugin; removing it would leave no network",
        ));
    }
    let mode = mode_of(&path);

    // Was it converted from a .conf that is still kept?
    let conf = path.with_extension("conf");
    let conf_backup = backup_path(&conf);
    if conf_backup.is_file() && !conf.exists() {
        let original = fs::read_to_string(&conf_backup).map_err(read_err(&conf_backup))?;
        if convert_conf(&conf_backup, &original, None).ok().as_ref() == Some(&remaining) {
            if !dry_run {
                fs::rename(&conf_backup, &conf).map_err(write_err("restore", &conf))?;
                fs::remove_file(&path).map_err(write_err("remove", &path))?;
                sync_dir(&path)?;
            }
            return Ok(Outcome::Uninstalled {
                file: path,
                restored: Some(conf),
                matches_backup: true,
                contents: original,
            });
        }
    }

    let backup = backup_path(&path);
    let matches_backup = fs::read(&backup).is_ok_and(|b| b == contents.as_bytes());
    if !dry_run {
        write_atomic(&path, contents.as_bytes(), mode)?;
        if matches_backup {
            fs::remove_file(&backup).map_err(write_err("remove", &backup))?;
        }
    }
    Ok(Outcome::Uninstalled {
        file: path,
        restored: None,
        matches_backup,
        contents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Value {
        plugin_entry(None).unwrap()
    }

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            fs::write(d.path().join(name), text).unwrap();
        }
        d
    }

    const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
"#;

    #[test]
    fn install_appends_with_the_files_layout_and_uninstall_restores_every_byte() {
        let d = dir_with(&[("10-flannel.conflist", FLANNEL)]);
        let out = install(d.path(), None, &entry(), false).unwrap();
        let file = d.path().join("10-flannel.conflist");
        let text = fs::read_to_string(&file).unwrap();
        assert!(
            text.contains("    },\n    {\n      \"type\": \"palisade\"\n    }\n  ]\n}"),
            "{text}"
        );
        assert!(matches!(
            out,
            Outcome::Installed {
                converted_from: None,
                ..
            }
        ));
        assert_eq!(
            fs::read_to_string(backup_path(&file)).unwrap(),
            FLANNEL,
            "the backup is the original"
        );
        // Idempotent.
        assert_eq!(
            install(d.path(), None, &entry(), false).unwrap(),
            Outcome::AlreadyInstalled { file: file.clone() }
        );
        assert_eq!(fs::read_to_string(&file).unwrap(), text);

        let out = uninstall(d.path(), None, false).unwrap();
        assert!(matches!(
            out,
            Outcome::Uninstalled {
                matches_backup: true,
                ..
            }
        ));
        assert_eq!(fs::read_to_string(&file).unwrap(), FLANNEL);
        assert!(!backup_path(&file).exists());
        assert_eq!(
            uninstall(d.path(), None, false).unwrap(),
            Outcome::NotInstalled {
                dir: d.path().to_owned()
            }
        );
    }

    #[test]
    fn compact_and_tab_indented_files_keep_their_style() {
        let compact =
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#;
        let d = dir_with(&[("a.conflist", compact)]);
        install(d.path(), None, &entry(), false).unwrap();
        let text = fs::read_to_string(d.path().join("a.conflist")).unwrap();
        assert_eq!(
            text,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"portmap"},{"type":"palisade"}]}"#
        );
        uninstall(d.path(), None, false).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("a.conflist")).unwrap(),
            compact
        );

        let tabs = "{\n\t\"cniVersion\": \"1.0.0\",\n\t\"name\": \"n\",\n\t\"plugins\": [\n\t\t{\n\t\t\t\"type\": \"bridge\"\n\t\t}\n\t]\n}\n";
        let d = dir_with(&[("a.conflist", tabs)]);
        install(d.path(), None, &entry(), false).unwrap();
        let text = fs::read_to_string(d.path().join("a.conflist")).unwrap();
        assert!(
            text.contains("\t\t},\n\t\t{\n\t\t\t\"type\": \"palisade\"\n\t\t}\n\t]"),
            "{text}"
        );
        uninstall(d.path(), None, false).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("a.conflist")).unwrap(),
            tabs
        );
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist_and_comes_back() {
        let conf = r#"{"cniVersion": "0.4.0", "name": "mynet", "type": "bridge", "bridge": "cni0",
 "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}
"#;
        let d = dir_with(&[("10-mynet.conf", conf)]);
        let out = install(d.path(), None, &entry(), false).unwrap();
        let list = d.path().join("10-mynet.conflist");
        assert!(matches!(
            out,
            Outcome::Installed {
                converted_from: Some(_),
                ..
            }
        ));
        assert!(!d.path().join("10-mynet.conf").exists());
        let v: Value = serde_json::from_str(&fs::read_to_string(&list).unwrap()).unwrap();
        assert_eq!(v["name"], "mynet");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][0]["ipam"]["subnet"], "10.22.0.0/16");
        assert!(v["plugins"][0].get("name").is_none());
        assert_eq!(v["plugins"][1], json_palisade());
        // What the runtime now reads first is the conflist.
        assert_eq!(config_files(d.path()).unwrap(), vec![list.clone()]);

        let out = uninstall(d.path(), None, false).unwrap();
        assert!(matches!(
            out,
            Outcome::Uninstalled {
                restored: Some(_),
                ..
            }
        ));
        assert_eq!(
            fs::read_to_string(d.path().join("10-mynet.conf")).unwrap(),
            conf
        );
        assert!(!list.exists());
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "nothing else left"
        );
    }

    fn json_palisade() -> Value {
        serde_json::json!({"type": "palisade"})
    }

    #[test]
    fn the_runtimes_file_is_chosen_and_an_explicit_one_wins() {
        let d = dir_with(&[
            (
                "20-other.conflist",
                r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"bridge"}]}"#,
            ),
            (
                "10-first.conflist",
                r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"bridge"}]}"#,
            ),
            ("05-notes.txt", "not a config"),
        ]);
        install(d.path(), None, &entry(), false).unwrap();
        assert!(
            fs::read_to_string(d.path().join("10-first.conflist"))
                .unwrap()
                .contains("palisade")
        );
        assert!(
            !fs::read_to_string(d.path().join("20-other.conflist"))
                .unwrap()
                .contains("palisade")
        );
        let other = d.path().join("20-other.conflist");
        install(d.path(), Some(&other), &entry(), false).unwrap();
        assert!(fs::read_to_string(&other).unwrap().contains("palisade"));
    }

    #[test]
    fn malformed_files_are_refused_and_left_untouched() {
        let cases = [
            (
                "a.conflist",
                "{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"plugins\": [",
                "not valid JSON",
            ),
            ("a.conflist", "[1, 2]", "not a JSON object"),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                "no \"plugins\"",
            ),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                "is empty",
            ),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n","plugins":{"type":"x"}}"#,
                "not a list",
            ),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"bridge":"x"}]}"#,
                "no \"type\"",
            ),
            (
                "a.conflist",
                r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#,
                "no network \"name\"",
            ),
            (
                "a.conflist",
                r#"{"cniVersion":"9.9.9","name":"n","plugins":[{"type":"bridge"}]}"#,
                "cniVersion \"9.9.9\"",
            ),
            (
                "a.conf",
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                "no \"type\"",
            ),
        ];
        for (name, text, want) in cases {
            let d = dir_with(&[(name, text)]);
            let err = install(d.path(), None, &entry(), false)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{name} {text}: {err}");
            assert_eq!(fs::read_to_string(d.path().join(name)).unwrap(), text);
            assert_eq!(
                fs::read_dir(d.path()).unwrap().count(),
                1,
                "no backup or temp file"
            );
        }
        let d = tempfile::tempdir().unwrap();
        let err = install(d.path(), None, &entry(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no CNI network configuration"), "{err}");
    }

    #[test]
    fn dry_run_changes_nothing_and_settings_are_checked() {
        let d = dir_with(&[("10-flannel.conflist", FLANNEL)]);
        let out = install(d.path(), None, &entry(), true).unwrap();
        let Outcome::Installed { contents, .. } = out else {
            panic!("{out:?}");
        };
        assert!(contents.contains("palisade"));
        assert_eq!(
            fs::read_to_string(d.path().join("10-flannel.conflist")).unwrap(),
            FLANNEL
        );
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);

        let e = plugin_entry(Some(r#"{"failOpen": true}"#)).unwrap();
        assert_eq!(e, serde_json::json!({"type": "palisade", "failOpen": true}));
        assert!(plugin_entry(Some(r#"{"type": "bridge"}"#)).is_err());
        assert!(plugin_entry(Some("[]")).is_err());
    }

    #[test]
    fn an_edited_file_loses_only_the_palisade_entry() {
        let d = dir_with(&[("10-flannel.conflist", FLANNEL)]);
        install(d.path(), None, &entry(), false).unwrap();
        let file = d.path().join("10-flannel.conflist");
        let edited = fs::read_to_string(&file).unwrap().replace("cbr0", "cbr1");
        fs::write(&file, &edited).unwrap();
        let out = uninstall(d.path(), None, false).unwrap();
        assert!(matches!(
            out,
            Outcome::Uninstalled {
                matches_backup: false,
                ..
            }
        ));
        assert_eq!(
            fs::read_to_string(&file).unwrap(),
            FLANNEL.replace("cbr0", "cbr1")
        );
        assert!(
            backup_path(&file).exists(),
            "the backup stays when it differs"
        );
    }
}
