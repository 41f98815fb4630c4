"""The clinic's gateway: receive, verify, store and acknowledge captures, export DICOM, keep
the case registry and the audit log, send commands (``clinic-gateway``). It shares the wire
package (``dermascope_wire``) with the device and never imports the simulator."""
