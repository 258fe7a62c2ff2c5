//! The model's choices reach the command line through their own `FromStr` (no CLI derive in the
//! model): every name parses, and a wrong one is refused with the option and the allowed names.
mod common;
use common::*;

/// Each name picks its model: the parameter counts `info` prints differ between the choices
/// (the same counts the build before the change printed, which parsed through clap's derive).
#[test]
fn model_choices_parse_by_name() {
    for (args, params) in [
        ("--arch wide-unet --preset paper", 557_306),
        ("--arch unet --preset paper", 465_953),
        ("--arch unet --preset modern", 473_537),
        ("--encoder resnet18 --channels 3", 225_762),
    ] {
        let args: Vec<&str> = ["info", "--depth", "2"].into_iter().chain(args.split(' ')).collect();
        let out = unetpp(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains(&format!("parameters: {params} ")), "{args:?}:\n{text}");
    }
}

#[test]
fn a_wrong_name_lists_the_allowed_ones() {
    for (option, allowed) in [
        ("--arch", "unet, wide-unet, unetpp"),
        ("--preset", "paper, modern"),
        ("--encoder", "plain, resnet18, resnet34, resnet50"),
    ] {
        let out = unetpp(&["info", option, "bogus"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && !err.contains("panicked"), "{option}:\n{err}");
        assert!(err.contains(&format!("{option} must be one of {allowed}, got `bogus`")), "{option}:\n{err}");
    }
}
