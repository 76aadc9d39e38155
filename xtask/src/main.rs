//! `cargo xtask …`: pinlab's command line. This file only dispatches; each
//! task lives in its own module.

mod apt;
mod bench;
mod blockmap;
mod clean;
mod cleanup;
mod console;
mod flags;
mod host;
mod html;
mod image;
mod junit;
mod kernel;
mod kvm;
mod lab;
mod placement;
mod qemu;
mod report;
mod run;
mod series;
mod sources;
mod test;
mod ui;
mod util;
mod verdict;
mod vm;

use anyhow::Result;
use std::process::ExitCode;

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            // 69 (EX_UNAVAILABLE): the infrastructure failed, not an expectation.
            ExitCode::from(69)
        }
    }
}

/// The exit code: 0 all as expected, 1 an expectation (or check) failed,
/// 69 the infrastructure failed (also for every error returned here).
fn real_main() -> Result<u8> {
    let flags = flags::Xtask::from_env_or_exit();
    let cache = util::Cache::from_env()?;
    std::env::set_current_dir(util::project_root())?;
    if !matches!(flags.subcommand, flags::XtaskCmd::KvmProbe(_)) {
        cleanup::install();
        cleanup::sweep_all(&cache);
    }
    let ok = |b: bool| if b { 0 } else { 1 };
    Ok(match flags.subcommand {
        flags::XtaskCmd::Doctor(_) => host::doctor(&cache).map(|()| 0)?,
        flags::XtaskCmd::Kernel(k) => match k.subcommand {
            flags::KernelCmd::Build(k) => {
                host::ensure(&[host::Need::Kernel, host::Need::Image], k.no_install)?;
                let source = match k.kernel_tree {
                    Some(p) => kernel::Source::Tree(p),
                    None => kernel::Source::Debian,
                };
                let sources = sources::resolve(&cache, k.locked)?;
                let flavor = k.flavor.unwrap_or(pinlab_scenarios::Flavor::Stock);
                let built = kernel::build(&cache, flavor, &source, &sources)?;
                println!("{}", built.bzimage.display());
                0
            }
            flags::KernelCmd::CheckSeries(c) => {
                host::ensure(&[host::Need::Kernel, host::Need::Image], false)?;
                ok(series::check(&cache, c.full)?)
            }
            flags::KernelCmd::Edit(_) => series::edit(&cache).map(|()| 0)?,
            flags::KernelCmd::Export(_) => series::export(&cache).map(|()| 0)?,
        },
        flags::XtaskCmd::Image(i) => {
            host::ensure(&[host::Need::Image, host::Need::Demos], i.no_install)?;
            if i.update_lock {
                image::update_lock(&cache)?;
            }
            let sources = sources::resolve(&cache, i.locked)?;
            let root = image::build(&cache, &sources)?;
            println!("{}", root.display());
            0
        }
        flags::XtaskCmd::Run(r) => {
            let demo = match r.what.as_deref() {
                None => false,
                Some("demo") => true,
                Some(other) => anyhow::bail!("unknown run target '{other}' (did you mean `cargo xtask run demo`?)"),
            };
            run::run(
                &cache,
                run::RunOpts {
                    flavors: r.flavor,
                    fss: r.fs,
                    scenarios: r.scenario,
                    accel: r.accel,
                    kernel_tree: r.kernel_tree,
                    no_install: r.no_install,
                    demo,
                    explain: r.explain,
                    locked: r.locked,
                },
            )?
            .code()
        }
        flags::XtaskCmd::Report(r) => {
            report::rerender(&r.dir.unwrap_or_else(|| util::target_dir().join("runs").join("latest"))).map(|()| 0)?
        }
        flags::XtaskCmd::Shell(sh) => run::shell(
            &cache,
            sh.flavor.unwrap_or(pinlab_scenarios::Flavor::Stock),
            sh.fs.unwrap_or(pinlab_scenarios::Fs::Ext4),
            sh.accel,
            sh.locked,
        )
        .map(|()| 0)?,
        flags::XtaskCmd::Test(t) => test::run(&cache, t.unit, t.debug, t.accel, t.locked)?.code(),
        flags::XtaskCmd::Bench(b) => ok(bench::bench(
            &cache,
            bench::BenchOpts { flavors: b.flavor, fss: b.fs, reps: b.reps, accel: b.accel, locked: b.locked },
        )?),
        flags::XtaskCmd::Clean(c) => clean::clean(&cache, c.all).map(|()| 0)?,
        flags::XtaskCmd::KvmProbe(_) => kvm::child_main().map(|()| 0)?,
    })
}
