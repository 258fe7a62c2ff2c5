//! The model's choices by the names the command line and config files use (serde's kebab-case
//! names): `FromStr` and `Display` here, so that the model knows no CLI library and the CLI
//! parses through these.

use super::{Arch, Encoder, Preset};
use std::fmt;
use std::str::FromStr;

impl Arch {
    pub const VALUES: &[Arch] = &[Arch::Unet, Arch::WideUnet, Arch::Unetpp];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Unet => "unet",
            Arch::WideUnet => "wide-unet",
            Arch::Unetpp => "unetpp",
        }
    }
}

impl Encoder {
    pub const VALUES: &[Encoder] = &[Encoder::Plain, Encoder::Resnet18, Encoder::Resnet34, Encoder::Resnet50];

    pub fn name(self) -> &'static str {
        match self {
            Encoder::Plain => "plain",
            Encoder::Resnet18 => "resnet18",
            Encoder::Resnet34 => "resnet34",
            Encoder::Resnet50 => "resnet50",
        }
    }
}

impl Preset {
    pub const VALUES: &[Preset] = &[Preset::Paper, Preset::Modern];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Paper => "paper",
            Preset::Modern => "modern",
        }
    }
}

/// `--option must be one of a, b, c, got `s``: the message names the option and what it allows.
fn parse<T: Copy>(s: &str, option: &str, values: &[T], name: fn(T) -> &'static str) -> Result<T, String> {
    values.iter().copied().find(|&v| name(v) == s).ok_or_else(|| {
        let names: Vec<&str> = values.iter().map(|&v| name(v)).collect();
        format!("{option} must be one of {}, got `{s}`", names.join(", "))
    })
}

macro_rules! by_name {
    ($t:ty, $option:literal) => {
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                parse(s, $option, Self::VALUES, Self::name)
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

by_name!(Arch, "--arch");
by_name!(Encoder, "--encoder");
by_name!(Preset, "--preset");

#[cfg(test)]
mod tests {
    use super::*;

    /// Each name parses to its variant, prints as itself and is serde's name for it (config
    /// files and the command line agree); an unknown name gets the option and the allowed names.
    fn check<T>(values: &[T], option: &str, names: &str)
    where
        T: Copy + PartialEq + fmt::Debug + fmt::Display + FromStr<Err = String> + serde::Serialize,
    {
        for &v in values {
            let name = v.to_string();
            assert_eq!(name.parse::<T>().unwrap(), v);
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{name}\""));
        }
        let err = "nope".parse::<T>().unwrap_err();
        assert_eq!(err, format!("{option} must be one of {names}, got `nope`"));
    }

    #[test]
    fn names_parse_print_and_match_serde() {
        check(Arch::VALUES, "--arch", "unet, wide-unet, unetpp");
        check(Encoder::VALUES, "--encoder", "plain, resnet18, resnet34, resnet50");
        check(Preset::VALUES, "--preset", "paper, modern");
    }
}
