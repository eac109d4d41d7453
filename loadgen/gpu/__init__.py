"""The first-GPU check: `loadgen.gpu.pack` makes what travels (int8 tiny.en, audio, the CPU's
reference transcripts, the wheels the GPU machine lacks, derived by `loadgen.gpu.needs`);
`loadgen.gpu.check` runs on the GPU machine and writes one JSON of figures. Importing this
package imports nothing beyond the standard library."""
