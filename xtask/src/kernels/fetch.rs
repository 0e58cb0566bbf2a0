//! Kernels from Debian's archive, and the initramfs that boots them.
//!
//! Packages are fetched by name with the ordinary apt client, through a sources list and
//! apt state of their own per Debian release under the cache directory, so the system's
//! sources are never touched. The generic flavour, not `cloud` (it lacks 9p), unsigned
//! (the same kernel; QEMU boots it directly).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use super::Series;
use crate::run;

/// What the host needs to boot guests; installed only when `cargo xtask kernels` runs.
const HOST_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "xz-utils"];
pub const BUSYBOX: &str = "/bin/busybox";
/// The modules the initramfs loads to reach the host's root (virtio-9p) and lay the
/// overlay on it; with their dependencies.
const INITRD_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// An unpacked kernel package, ready to boot.
pub struct Kernel {
    pub series: Series,
    /// The package name and version, e.g. `linux-image-6.1.0-41-amd64-unsigned 6.1.158-1`.
    pub package: String,
    pub version: String,
    /// The unpacked package: boot/vmlinuz-*, lib/modules/<release>/.
    pub dir: PathBuf,
    pub release: String,
    pub initrd: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }
    pub fn modules(&self) -> PathBuf {
        self.dir.join("lib/modules")
    }
}

pub fn install_host_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .copied()
        .filter(|p| !crate::setup::installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("kernels: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The kernel of `series`, fetched and unpacked once into `cache`; its initramfs is built
/// again on every run (a second, and it follows xtask/guest/init).
pub fn kernel(cache: &Path, series: &Series) -> anyhow::Result<Kernel> {
    let dir = cache.join(format!("k{}", series.name));
    if !dir.join("package").exists() {
        unpack(cache, series, &dir)
            .with_context(|| format!("fetching the {} kernel", series.name))?;
    }
    let meta = std::fs::read_to_string(dir.join("package"))?;
    let (package, version) = meta
        .trim()
        .split_once(' ')
        .context("malformed package file")?;
    let release = only_entry(&dir.join("lib/modules"))?;
    let initrd = dir.join("initrd.img");
    build_initrd(&dir, &release, &initrd)?;
    Ok(Kernel {
        series: *series,
        package: package.to_string(),
        version: version.to_string(),
        dir,
        release,
        initrd,
    })
}

fn unpack(cache: &Path, series: &Series, dir: &Path) -> anyhow::Result<()> {
    let apt = AptState::new(cache, series.codename)?;
    run(apt.command("apt-get").args(["update", "-q"]))?;
    let search = apt
        .command("apt-cache")
        .args(["search", "--names-only"])
        .arg(format!("^linux-image-{}", series.name))
        .output()
        .context("running apt-cache search")?;
    let names = String::from_utf8_lossy(&search.stdout);
    let Some(package) = newest_image(
        series.name,
        names.lines().filter_map(|l| l.split(' ').next()),
    ) else {
        bail!(
            "no generic unsigned linux-image-{} package in {}",
            series.name,
            series.codename
        );
    };
    eprintln!("kernels: fetching {package} ({})", series.codename);
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    run(apt
        .command("apt-get")
        .current_dir(&debs)
        .args(["download", "-q", &package]))?;
    let deb = std::fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .context("apt-get download left no .deb")?;
    let version = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .arg("Version")
        .output()?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();

    let tmp = cache.join(format!("k{}.partial", series.name));
    let _ = std::fs::remove_dir_all(&tmp);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    // merged-/usr packages (trixie) keep the modules under usr/lib
    if !tmp.join("lib/modules").exists() {
        std::fs::create_dir_all(tmp.join("lib"))?;
        std::fs::rename(tmp.join("usr/lib/modules"), tmp.join("lib/modules"))?;
    }
    let release = only_entry(&tmp.join("lib/modules"))?;
    // trixie compresses its modules; busybox's modprobe in the guest loads plain .ko files
    run(Command::new("find")
        .arg(tmp.join("lib/modules"))
        .args(["-name", "*.ko.xz", "-exec", "xz", "-d", "{}", "+"]))?;
    run(Command::new(BUSYBOX)
        .args(["depmod", "-b"])
        .arg(&tmp)
        .arg(&release))?;
    std::fs::write(tmp.join("package"), format!("{package} {version}\n"))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir)?;
    std::fs::remove_file(&deb)?;
    Ok(())
}

/// apt's state for one Debian release, kept apart from the system's.
struct AptState {
    options: Vec<String>,
}

impl AptState {
    fn new(cache: &Path, codename: &str) -> anyhow::Result<AptState> {
        let d = cache.join(format!("apt-{codename}"));
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let sources = std::fs::read_dir("/etc/apt/sources.list.d")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "sources" || e == "list"))
            .chain([PathBuf::from("/etc/apt/sources.list")])
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect::<Vec<_>>()
            .join("\n\n");
        let (main, security) = mirrors(&sources);
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        std::fs::write(
            d.join("sources.list"),
            format!(
                "deb [signed-by={keyring}] {main} {codename} main\n\
                 deb [signed-by={keyring}] {security} {codename}-security main\n"
            ),
        )?;
        let p = |s: &str| d.join(s).display().to_string();
        let options = [
            format!("Dir::Etc::SourceList={}", p("sources.list")),
            "Dir::Etc::SourceParts=/dev/null".to_string(),
            format!("Dir::State::Lists={}", p("lists")),
            format!("Dir::Cache={}", p("cache")),
            // apt's download sandbox user cannot write into root's cache directory
            "APT::Sandbox::User=root".to_string(),
        ];
        Ok(AptState {
            options: options
                .iter()
                .flat_map(|o| ["-o".to_string(), o.clone()])
                .collect(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.args(&self.options);
        c
    }
}

/// The Debian and Debian-security mirrors this machine's apt sources use (deb822 or
/// one-line format), else deb.debian.org's.
pub fn mirrors(sources: &str) -> (String, String) {
    let mut main = None;
    let mut security = None;
    let mut note = |uri: &str, suites: &str| {
        let slot = if suites.split_whitespace().any(|s| s.ends_with("-security")) {
            &mut security
        } else {
            &mut main
        };
        if slot.is_none() && uri.contains("debian") {
            *slot = Some(uri.trim_end_matches('/').to_string());
        }
    };
    for stanza in sources.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
            if let Some(uri) = uris.split_whitespace().next() {
                note(uri, suites);
            }
        }
        for line in stanza.lines() {
            let mut words = line.split_whitespace().filter(|w| !w.starts_with('['));
            if words.next() != Some("deb") {
                continue;
            }
            // "deb [options] uri suite components": options may hold spaces inside [ ]
            let rest = line.trim_start_matches("deb").trim();
            let rest = match rest.strip_prefix('[') {
                Some(r) => r.split_once(']').map_or("", |(_, r)| r),
                None => rest,
            };
            let mut w = rest.split_whitespace();
            if let (Some(uri), Some(suite)) = (w.next(), w.next()) {
                note(uri, suite);
            }
        }
    }
    (
        main.unwrap_or_else(|| "http://deb.debian.org/debian".into()),
        security.unwrap_or_else(|| "http://deb.debian.org/debian-security".into()),
    )
}

/// The newest generic unsigned image of `series` among package `names`:
/// `linux-image-6.1.0-41-amd64-unsigned`, `linux-image-6.12.57+deb13-amd64-unsigned`; not
/// `-cloud-`, `-rt-` or `-dbg`.
pub fn newest_image<'a>(series: &str, names: impl Iterator<Item = &'a str>) -> Option<String> {
    names
        .filter(|n| {
            let Some(rest) = n
                .strip_prefix("linux-image-")
                .and_then(|r| r.strip_prefix(series))
                .and_then(|r| r.strip_suffix("-amd64-unsigned"))
            else {
                return false;
            };
            // what is left is the rest of the version: ".0-41", ".57+deb13", "-1"...
            let rest = rest.split_once("+deb").map_or(rest, |(v, d)| {
                if d.chars().all(|c| c.is_ascii_digit()) {
                    v
                } else {
                    "x"
                }
            });
            (rest.is_empty() || rest.starts_with(['.', '-']))
                && rest
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
        })
        .max_by(|a, b| version_key(a).cmp(&version_key(b)))
        .map(str::to_string)
}

/// The numbers in a name, in order: enough to order kernel ABI versions.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The modules `wanted` and everything they depend on, as paths relative to the module
/// directory, from `modules.dep` ("kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko ...").
/// Built-in modules are not listed there and need nothing.
pub fn module_closure(modules_dep: &str, wanted: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in modules_dep.lines() {
        let Some((module, deps)) = line.split_once(':') else {
            continue;
        };
        let stem = Path::new(module)
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_suffix(".ko"))
            .unwrap_or("");
        if !wanted.contains(&stem) {
            continue;
        }
        for m in std::iter::once(module).chain(deps.split_whitespace()) {
            if !out.iter().any(|o| o == m) {
                out.push(m.to_string());
            }
        }
    }
    out.sort();
    out
}

/// A busybox initramfs: xtask/guest/init and the modules it loads.
fn build_initrd(kdir: &Path, release: &str, out: &Path) -> anyhow::Result<()> {
    let w = kdir.join("initrd.d");
    let _ = std::fs::remove_dir_all(&w);
    let mods = w.join("lib/modules").join(release);
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "mnt/lower",
        "mnt/rw",
        "newroot",
    ] {
        std::fs::create_dir_all(w.join(d))?;
    }
    std::fs::create_dir_all(&mods)?;
    std::fs::copy(BUSYBOX, w.join("bin/busybox"))?;
    for applet in [
        "sh",
        "mount",
        "mkdir",
        "modprobe",
        "switch_root",
        "cat",
        "cp",
        "ln",
        "sed",
    ] {
        std::os::unix::fs::symlink("busybox", w.join("bin").join(applet))?;
    }
    let src = kdir.join("lib/modules").join(release);
    let dep = std::fs::read_to_string(src.join("modules.dep")).context("reading modules.dep")?;
    for m in module_closure(&dep, INITRD_MODULES) {
        let to = mods.join(&m);
        std::fs::create_dir_all(to.parent().unwrap())?;
        std::fs::copy(src.join(&m), &to).with_context(|| format!("copying module {m}"))?;
    }
    std::fs::copy(src.join("modules.dep"), mods.join("modules.dep"))?;
    std::fs::copy(super::guest_file("init"), w.join("init"))?;
    let archive = format!(
        "find . | {BUSYBOX} cpio -o -H newc 2>/dev/null | gzip -1 > '{}'",
        out.display()
    );
    run(Command::new("sh").arg("-c").arg(archive).current_dir(&w))?;
    std::fs::remove_dir_all(&w)?;
    Ok(())
}

/// The one entry of a directory (a kernel package has one lib/modules/<release>).
fn only_entry(dir: &Path) -> anyhow::Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    match names.len() {
        1 => Ok(names.pop().unwrap()),
        n => bail!("{} has {n} entries, expected one", dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_generic_unsigned_image() {
        let names = [
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-41-amd64-unsigned",
            "linux-image-6.1.0-41-cloud-amd64-unsigned",
            "linux-image-6.1.0-42-rt-amd64-unsigned",
            "linux-image-6.1.0-42-amd64-dbg",
            "linux-image-6.1.0-42-amd64",
            "linux-image-6.10.1-amd64-unsigned",
            "linux-image-6.12.57+deb13-amd64-unsigned",
            "linux-image-6.12.9+deb13-amd64-unsigned",
            "linux-image-6.12.60+deb13-cloud-amd64-unsigned",
            "linux-image-5.10.0-36-amd64-unsigned",
            "linux-image-5.10.0-8-amd64-unsigned",
        ];
        let cases = [
            ("6.1", Some("linux-image-6.1.0-41-amd64-unsigned")),
            ("6.12", Some("linux-image-6.12.57+deb13-amd64-unsigned")),
            ("5.10", Some("linux-image-5.10.0-36-amd64-unsigned")),
            ("5.15", None),
        ];
        for (series, want) in cases {
            assert_eq!(
                newest_image(series, names.iter().copied()).as_deref(),
                want,
                "{series}"
            );
        }
    }

    #[test]
    fn reads_mirrors_from_both_source_formats() {
        let deb822 =
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n";
        assert_eq!(
            mirrors(deb822),
            (
                "http://mirror.example/debian".into(),
                "http://mirror.example/debian-security".into()
            )
        );
        let one_line = "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian/ bookworm main\n\
                        deb https://packages.cloud.google.com/apt cloud-sdk main\n\
                        deb http://s.example/debian-security bookworm-security main\n";
        assert_eq!(
            mirrors(one_line),
            (
                "http://m.example/debian".into(),
                "http://s.example/debian-security".into()
            )
        );
        assert_eq!(
            mirrors(""),
            (
                "http://deb.debian.org/debian".into(),
                "http://deb.debian.org/debian-security".into()
            )
        );
    }

    #[test]
    fn takes_the_modules_and_their_dependencies() {
        let dep = "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n\
                   kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko\n\
                   kernel/net/9p/9pnet.ko:\n\
                   kernel/fs/overlayfs/overlay.ko:\n\
                   kernel/drivers/net/veth.ko:\n";
        assert_eq!(
            module_closure(dep, INITRD_MODULES),
            [
                "kernel/fs/9p/9p.ko",
                "kernel/fs/netfs/netfs.ko",
                "kernel/fs/overlayfs/overlay.ko",
                "kernel/net/9p/9pnet.ko",
                "kernel/net/9p/9pnet_virtio.ko",
            ]
        );
    }
}
