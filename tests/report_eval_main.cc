// Test helper: reports an evaluation of a running run through the WorkerGateway, as the group
// that trains it would, so that the metrics tests can see FID and IS series before the trainer
// evaluates by itself.
// usage: ddpm_test_report_eval HOST:PORT RUN FID IS
// (tokens from $DDPM_CONTROL_TOKEN and $DDPM_WORKER_TOKEN)
#include <cstdio>
#include <string>

#include "ddpm/v1/control.grpc.pb.h"
#include "ddpm/v1/worker_gateway.grpc.pb.h"
#include "proto/rpc.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s HOST:PORT RUN FID IS\n", argv[0]);
    return 2;
  }
  ddpm::ChannelOptions channel;
  channel.address = argv[1];
  const std::string control_token = ddpm::ReadToken("", "DDPM_CONTROL_TOKEN");
  const std::string worker_token = ddpm::ReadToken("", "DDPM_WORKER_TOKEN");

  ddpm::v1::GetRunRequest get;
  get.set_run(argv[2]);
  ddpm::v1::GetRunResponse got;
  grpc::Status status =
      ddpm::MakeClient<ddpm::v1::Control>(channel)->GetRun(ddpm::MakeContext(control_token).get(),
                                                           get, &got);
  if (!status.ok()) {
    std::fprintf(stderr, "%s\n", ddpm::DescribeStatus("GetRun", status).c_str());
    return 1;
  }
  ddpm::v1::ReportEvalRequest report;
  report.set_group_id(got.run().placement().group_id());
  report.set_attempt(got.run().placement().attempt());
  report.set_run_id(got.run().id());
  report.mutable_eval()->set_step(got.run().metrics().step());
  report.mutable_eval()->set_fid(std::stod(argv[3]));
  report.mutable_eval()->set_inception_score(std::stod(argv[4]));
  report.mutable_eval()->set_num_samples(16);
  ddpm::v1::ReportEvalResponse reported;
  status = ddpm::MakeClient<ddpm::v1::WorkerGateway>(channel)->ReportEval(
      ddpm::MakeContext(worker_token).get(), report, &reported);
  if (!status.ok()) {
    std::fprintf(stderr, "%s\n", ddpm::DescribeStatus("ReportEval", status).c_str());
    return 1;
  }
  return 0;
}
