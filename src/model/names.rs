//! The model's choices by the names the command line and config files use (serde's kebab-case
//! names): `FromStr` and `Display` here, so that the model knows no CLI library and the CLI
//! parses through these.

use super::{Arch, Encoder, Preset};

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

crate::names::by_name!(Arch, "--arch");
crate::names::by_name!(Encoder, "--encoder");
crate::names::by_name!(Preset, "--preset");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::check_names;

    #[test]
    fn names_parse_print_and_match_serde() {
        check_names(Arch::VALUES, "--arch", "unet, wide-unet, unetpp");
        check_names(Encoder::VALUES, "--encoder", "plain, resnet18, resnet34, resnet50");
        check_names(Preset::VALUES, "--preset", "paper, modern");
    }
}
