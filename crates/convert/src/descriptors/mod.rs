//! Readers of foreign VM descriptions. Each turns the text of one kind of
//! descriptor into a [`crate::foreign::ForeignVm`], keeping the source's own
//! words for controllers and models; none opens a file (references stay
//! text until [`crate::paths`] resolves them).

pub mod hyperv;
pub mod libvirt;
pub mod ovf;
pub mod vbox;
pub mod vmx;
